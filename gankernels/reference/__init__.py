"""The reference backend, named ``torch``: stock PyTorch composites (cuDNN on a GPU).

It serves every call, and its formulas (:mod:`gankernels.ops.reference`) are the
specification the fast backends are tested against. :mod:`gankernels.reference.register`
registers it with the dispatcher, the same way ``gankernels.triton`` and
``gankernels.cuda`` register theirs.
"""
