"""Training: the train state and step, building an experiment from a config, the wall-clock
schedule fit and non-finite loss diagnosis."""
