"""Fine-tuning and evaluation: CTC speech recognition, image, text and audio classification."""
