"""Progressive distillation (Salimans & Ho 2022): a student that samples in a few steps, stage by stage."""
