"""Task heads (kind ``head``): classification, CTC, text and codec heads on the shared decoder, standalone LLM heads."""
