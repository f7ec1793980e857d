"""The configuration: defaults and validation (`configuration`), and which changes a saved
workdir accepts (`compat`)."""
