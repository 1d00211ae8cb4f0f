"""Many runs at once: ``lenet compare`` (variants of a spec side by side) and ``lenet bench``."""
