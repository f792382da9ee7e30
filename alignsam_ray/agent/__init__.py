"""The agent: SRM, actor-critic RLModule, RLlib callbacks."""
