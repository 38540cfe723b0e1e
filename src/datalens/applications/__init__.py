"""Layer 5: what the methods are used for: counterfactuals, the compute comparison, ModelDiff, unlearning."""
