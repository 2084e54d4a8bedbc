"""The emotion story corpus, neutral dialogues and evaluation prompts that ship with emoscope."""
