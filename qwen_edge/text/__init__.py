"""Text: the tokenizer, chat templates, the tokenizer.json builder, the UTF-8-safe stream decoder and the shipped
evaluation text. Used by the model files (an artifact ships its tokenizer) and by the runtime alike."""
