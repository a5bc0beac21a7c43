"""Built-in methods, one package each. Importing a package registers its method."""

from subtune.methods import full, lamda, lora, s2ft, smt  # noqa: F401
