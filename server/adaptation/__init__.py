"""Background adaptation: worker threads, the session train step, and fine-tuning jobs."""
