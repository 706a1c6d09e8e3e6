"""Training: the options, the loop (the paper's recipe), the run folder, preemption, fast defaults, EMA, export."""
