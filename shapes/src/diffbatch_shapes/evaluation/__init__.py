"""Evaluations of generated images (``eval-shapes``: prompt adherence of the embedded shapes model)."""
