"""The embedded shapes world (docs/design.md §5): prompts, renderer, exact checker, tiny models.

``capo.shapes.world`` holds the grammar, prompt splits and renderer; ``capo.shapes.checker`` the
gold metric. Submodules are imported explicitly (nothing heavy is imported here).
"""
