"""GPU memory before any weight is read: tensors from headers, the estimate, devices, fit."""
