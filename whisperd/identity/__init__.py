"""Who is calling and what they may do: the Bearer check (auth), failed checks throttled (guard),
the ledger's tokens (tokens) and per-token limits (limits)."""
