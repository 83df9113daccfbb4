"""The Hugging Face hub: ``download`` (through huggingface_hub), subset selection through the index
(``select``) and the local hub-compatible server the tests and benchmarks use (``server``)."""
