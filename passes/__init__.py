"""graphopt's built-in passes, one module per pass (installed as `graphopt.passes`)."""
