"""Training stages driven through ms-swift."""
