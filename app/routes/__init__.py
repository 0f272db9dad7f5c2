"""HTTP routers: thin; they call the API adapters (`app.api`) or `ModelService`, and never touch torch."""
