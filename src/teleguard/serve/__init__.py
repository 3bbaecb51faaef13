"""Real-time detection of fraud in live calls: the engine-independent core.

`protocol` holds the messages of the streaming protocol (open a call, send chunks, get decisions, close for a
verdict) and `RequestError`; `chunks` decodes and validates one chunk; `session` keeps one call's bounded
state and sequence numbers; `policy` decides when to ask the model, builds the same real-time prompts training
used (teleguard.contract, teleguard.data.rounds) and turns the model's answers into decisions. Servers and
engines plug in from outside: the policy calls an injected async `generate` function.
"""
