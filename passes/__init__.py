"""Built-in passes, one file each; fxquant.registry imports every module here on first lookup.

Add a pass: write `passes/my_pass.py` with `@register_pass("my-pass", options=MyOptions)` on a
function `(gm, ctx) -> PassResult`, and `tests/passes/test_my_pass.py`. Nothing else to edit.
"""
