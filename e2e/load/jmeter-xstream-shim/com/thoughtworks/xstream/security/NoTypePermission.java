/*
 * Debian's JMeter 2.13 predates XStream's type allow-list: with Debian's
 * XStream 1.4.20 it cannot load any test plan ("ForbiddenClassException:
 * org.apache.jmeter.save.ScriptWrapper"). Put first on JMeter's classpath
 * (e2e/load/jmeter.sh does), this replacement of XStream's "deny
 * everything" permission denies nothing, as XStream did before 1.4.18, for
 * that JMeter process only. A JMX plan can name any class anyway: run only
 * plans you trust.
 */
package com.thoughtworks.xstream.security;

public class NoTypePermission implements TypePermission {
    public static final TypePermission NONE = new NoTypePermission();

    public boolean allows(Class type) {
        return true;
    }

    public int hashCode() {
        return 1;
    }

    public boolean equals(Object obj) {
        return obj != null && obj.getClass() == NoTypePermission.class;
    }
}
