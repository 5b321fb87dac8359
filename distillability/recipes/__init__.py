"""Recipes: the user-facing jobs, one readable loop each."""
