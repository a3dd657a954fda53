"""OpenAI's Responses API as a translation over the chat completions pipeline: a response
request becomes a chat request (its context replayed from stored items), runs through the same
hooks and engines, and the chat answer, whole or streamed, becomes a Response object or the
Responses event sequence."""
