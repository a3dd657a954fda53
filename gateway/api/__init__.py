"""The API, one thin module per resource: each builds its router from the services it is
given."""
