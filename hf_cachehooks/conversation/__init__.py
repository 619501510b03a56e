"""The conversation token cache (memory and disk tiers), the logit lens, and the chat server with its web page."""
