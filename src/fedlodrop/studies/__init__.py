"""Many runs and what they say: grids over any key (`sweep`), their tables and plots (`report`),
the planners against their baselines (`comparison`), and fitting the bound (`calibration`)."""
