"""Recipes: what to build (recipe.py: schema, presets, the YAML type checker, overrides, validation, listing) and the
export -> cache -> verify pipeline a recipe drives (recipe_run.py: export or reuse the cached artifact, verify or reuse
a recorded parity, `run_export`)."""
