"""Ways to use batchproc inside other frameworks: the ``@batch`` decorator, Ray Serve.

Modules here import their framework lazily: ``import batchproc`` never imports Ray.
"""
