"""Webhooks: signed (Standard Webhooks), retried deliveries of jobs' terminal events.

Key contracts (docs/webhooks.md):

- A delivery is queued in the transaction that ends its job, so it is never lost and
  never sent for an end that was rolled back; every attempt sends the same body under
  the same `webhook-id`, so receivers can deduplicate (delivery is at least once).
- One sender holds a delivery at a time: a claim leases it by pushing
  `next_attempt_at` ahead; a sender that dies mid-send lets the lease lapse, and the
  delivery is sent again. Only the current claim may record an outcome.
- The target's addresses are checked when it is sent, and the connection goes to the
  address that was checked; redirects are never followed.
"""

from jobgate.webhooks.sender import WebhookSender

__all__ = ["WebhookSender"]
