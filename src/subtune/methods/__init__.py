"""Built-in methods, one package each. Importing a package registers its method."""

from subtune.methods import full, lamda, lora, s2ft, senszo, smt  # noqa: F401
