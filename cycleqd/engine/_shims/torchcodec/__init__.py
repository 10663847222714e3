"""Stands in for a torchcodec whose native library does not load against the installed torch.

vLLM treats a missing torchcodec as "no audio decoding" but fails on the OSError a
mismatched build raises; this package turns that into the ImportError vLLM expects.
Put on the path only by :func:`cycleqd.engine.vllm._import_vllm`, and only then.
"""
raise ImportError("torchcodec's native library does not load against this torch; audio decoding is off")
