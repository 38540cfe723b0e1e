"""Layer 2: training subset models of any task (the stacked engine) and resumable runs of them."""
