"""Real-time detection of fraud in live calls.

The engine-independent core: `protocol` holds the messages of the streaming protocol (open a call, send chunks,
get decisions, close for a verdict) and `RequestError`; `chunks` decodes and validates one chunk; `session`
keeps one call's bounded state and sequence numbers; `policy` decides when to ask the model, builds the same
real-time prompts training used (teleguard.contract, teleguard.data.rounds) and turns the model's answers into
decisions; `detector` runs calls, limits and metrics over them. Serving around it: `model` (the KServe model),
`routes` (the call and WebSocket routes), `server` (the app, `ServeConfig`, `build_server`), `cli`, `client`.

Engines plug in from outside: the policy and the detector call an injected async `generate` function
(`teleguard.engines.contract.Generate`); `teleguard.engines.factory.build_engine` builds the configured one
(ms-swift, vLLM, a remote endpoint, a cascade), and `teleguard.engines` never imports this package.
"""
