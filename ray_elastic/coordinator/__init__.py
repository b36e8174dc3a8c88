"""The coordinator: a state machine (controller), its policies, and the Ray worker group it drives."""
