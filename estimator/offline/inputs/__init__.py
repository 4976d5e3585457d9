"""What label reads: the built-in problem generator, data-set readers, the open-ended prompts, grading."""
