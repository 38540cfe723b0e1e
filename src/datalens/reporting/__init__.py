"""Layer 6: figures, stage reports and the report page, drawn from results."""
