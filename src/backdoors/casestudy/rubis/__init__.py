"""RUBiS: the auction site's schema, its generated data set, and its data access."""
