"""Reading and rendering training rows: files, chat templates, prompt formats."""
