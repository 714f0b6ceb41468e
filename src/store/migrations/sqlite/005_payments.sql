-- membersync schema v5: the payments events named (a bill, a payment, a card charge), each
-- tied to the membership it paid for. A refund or a dispute that names only the payment
-- finds its membership here; one payment announced twice (Stripe's invoice.paid and
-- invoice.payment_succeeded) counts once.
CREATE TABLE payments (
    tenant        TEXT NOT NULL,
    provider      TEXT NOT NULL,
    ref           TEXT NOT NULL,      -- invoice:…, payment:…, charge:…
    membership_id TEXT NOT NULL REFERENCES memberships (id),
    event_id      TEXT NOT NULL,      -- the provider event that first named it
    counted_by    TEXT,               -- the event that counted it as a payment, if one did
    PRIMARY KEY (tenant, provider, ref)
) WITHOUT ROWID;
