"""The unit-test reward for code: problems, pass@k metrics, the reward function and sandboxed execution."""
