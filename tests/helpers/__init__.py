"""Helpers shared by the tests: tiny pipelines, random adaptors, stub components (imported as ``helpers``)."""
