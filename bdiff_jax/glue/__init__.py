"""The GLUE / SuperGLUE fine-tuning benchmark: tasks and their readers, prompts and encoding,
few-shot sampling, classification objectives, benchmark rows, settings, start models,
resumable units, metrics, baselines and the report."""
