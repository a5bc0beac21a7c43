"""Built-in methods, one package each. Importing a package registers its method; `subtune/__init__.py` imports this
package (the core never does). The order below is the registry's, and so `subtune demo`'s row order: the baselines
full, lora, dora first, then s2ft, smt, lamda, lamda++, senszo, mezo."""

from subtune.methods import full, lora, s2ft, smt, lamda, senszo  # noqa: F401  (order matters, see above)
