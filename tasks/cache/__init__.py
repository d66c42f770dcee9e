"""Content-keyed caching for the pipeline's steps: keys, manifests, policy, locks."""
