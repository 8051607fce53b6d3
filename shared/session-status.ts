import { SessionStatus } from '../gen/tokenbroker/v1/token_broker.js';

/** A session's status by name, as records, logs and the sidecar's API spell it. */
export type SessionStatusName = 'ACTIVE' | 'REAUTH_REQUIRED' | 'REVOKED' | 'IDLE';

/** The wire value of each status name. */
export const STATUS_TO_PROTO: Readonly<Record<SessionStatusName, SessionStatus>> = {
  ACTIVE: SessionStatus.SESSION_STATUS_ACTIVE,
  REAUTH_REQUIRED: SessionStatus.SESSION_STATUS_REAUTH_REQUIRED,
  REVOKED: SessionStatus.SESSION_STATUS_REVOKED,
  IDLE: SessionStatus.SESSION_STATUS_IDLE,
};

const FROM_PROTO = new Map<SessionStatus, SessionStatusName>(
  Object.entries(STATUS_TO_PROTO).map(([name, value]) => [value, name as SessionStatusName]),
);

/** The name of a wire status; undefined for SESSION_STATUS_UNSPECIFIED or a newer broker's value. */
export function statusName(status: SessionStatus): SessionStatusName | undefined {
  return FROM_PROTO.get(status);
}
