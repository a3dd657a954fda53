"""What every route shares: authentication, body limits, the error mapping, middleware,
paging and timestamps."""
