"""The constants the data modules share: the kinds of content parts a message may hold, the placeholder a
text template sees for a clip, and the label of an unsupervised position.

A leaf (it imports nothing), so messages, images, audio and chat read them without importing one another.
"""

IMAGE_PART_TYPES = ("image", "image_url")  # as records give them; normalised to {"type": "image", ...}
AUDIO_PART_TYPES = ("audio", "audio_url")  # normalised to {"type": "audio", ...}
# One per clip in a speech-LM's rendered text, where vLLM's chat endpoint puts it; the speech-LM's processor
# expands it into the clip's frames (its config's `audio_token` defaults to this).
AUDIO_TOKEN = "<|audio|>"
IGNORE_INDEX = -100  # the label of a position no loss is taken at (transformers' convention)
