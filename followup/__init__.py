"""Follow-up: applies the pure rules (``registry.followup``) to the registry — the event-driven
re-evaluation, the daily sweep, the alert lifecycle and the outbox delivery. Sits above scoring
(it reads VBQ results) and below reports and integrations (docs/architecture.md)."""
