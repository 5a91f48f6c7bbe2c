"""Communications: status updates and their cadence, message templates, subscribers and
customer notices, the public status page and maintenance windows (issue 6).

Modules: `templates` (render and validate message templates), `updates` (status updates,
reminders, the chat webhook), `notices` (subscribers, customer notices, email), `status`
(the public status page's reads), `views_status` and `views_subscribe` (public pages).
"""
