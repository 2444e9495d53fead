"""The model-independent side of images, torch-free (the server imports it): the fetch policy and
fetching (fetch.py), safe decoding (image.py), and the prompt a model's processor makes of them
(inputs.py). Each model's preprocessing sits beside its tower in models/vision/."""
