"""Model-based (hypothesis state machine) tests over real registries."""
