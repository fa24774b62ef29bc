"""seedsift stages that hold a model: scorer, generator, rater (one module each)."""
