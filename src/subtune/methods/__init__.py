"""Built-in methods, one package each. Importing a package registers its method."""

from subtune.methods import full, lora, s2ft  # noqa: F401
